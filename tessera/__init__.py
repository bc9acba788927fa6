"""tessera: build, train, evaluate and serve multimodal LLMs — every design the article surveys is a switch."""

from tessera.config import FusionConfig, ModelConfig, TextConfig, VisionConfig
from tessera.errors import (CheckpointError, ConfigError, DataError, ImageTokenMismatchError, ImageTooLargeError,
                            ProcessGroupError, TesseraError, TrainingError)
from tessera.model import GenerationOutput, ModelOutput, MultimodalLM
from tessera.processor import Processor, ProcessorConfig
from tessera.text.tokenizer import train_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "FusionConfig", "GenerationOutput", "ImageTokenMismatchError",
    "ImageTooLargeError",
    "ModelConfig", "ModelOutput", "MultimodalLM", "ProcessGroupError", "Processor", "ProcessorConfig",
    "TesseraError", "TextConfig", "TrainingError", "VisionConfig", "train_tokenizer",
]
