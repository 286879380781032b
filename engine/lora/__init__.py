"""Fine-tunes of one base model served side by side: LoRA adapters (PEFT format) and P-tuning v2 prefixes."""
