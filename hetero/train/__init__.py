"""`hetero train`: LoRA fine-tuning over a frozen base held as stored (float, or the CPU
kernels' quantised formats), with adapters PEFT loads. A front end over the runtime."""
