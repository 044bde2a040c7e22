"""Reading model files: Hugging Face safetensors checkpoints (GGUF comes next)."""
