"""fedlora: federated fine-tuning of foundation models with LoRA."""
