"""CUDA-backend launchers: allocate outputs with torch, call libfastlayers_cuda through _cuda."""
