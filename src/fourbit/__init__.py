"""fourbit: QLoRA fine-tuning of large language models, from dataset to deployable model."""
__version__ = "0.1.0"
