"""The peer row of benchmarks/serve.py: a FastAPI endpoint around a Hugging Face `pipeline`, as a user
would write one (one forward pass per request, in FastAPI's thread pool, behind a lock because a
Hugging Face tokenizer must not be called from two threads at once). Loopback only.

    python benchmarks/hf_pipeline_server.py --model EXPORT_DIR --port 8001 [--precision bf16]
"""

import argparse
import threading

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline


class Body(BaseModel):
    inputs: str | list[str]


def create_app(model: str, precision: str) -> FastAPI:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    classify = pipeline("text-classification", model=model, tokenizer=model, dtype=dtype, top_k=None)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: Body):
        with lock:
            return classify(body.inputs, truncation=True)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a merged export (lorafit export --format merged)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    uvicorn.run(create_app(args.model, args.precision), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
