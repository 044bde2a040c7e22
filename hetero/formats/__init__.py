"""Weight formats that belong to no device: GGUF's quantised block layouts as data, their
dequantisers and quantisers in numpy. CPU and GPU kernels both read these layouts."""
