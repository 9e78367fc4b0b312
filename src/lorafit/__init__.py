"""lorafit: fine-tune a pretrained transformer with LoRA into a text classifier."""

__version__ = "0.2.0"

from .config import BertConfig, GPT2Config, LoRAConfig, TrainConfig  # noqa: E402
from .lora import LoRALinear, apply_lora, count_parameters, merge_lora, unmerge_lora  # noqa: E402
from .models.bert import Bert  # noqa: E402
from .models.gpt2 import GPT2  # noqa: E402
from .run import Classifier, load_classifier, train_run  # noqa: E402

__all__ = [
    "Bert",
    "BertConfig",
    "Classifier",
    "GPT2",
    "GPT2Config",
    "LoRAConfig",
    "LoRALinear",
    "TrainConfig",
    "apply_lora",
    "count_parameters",
    "load_classifier",
    "merge_lora",
    "train_run",
    "unmerge_lora",
]
