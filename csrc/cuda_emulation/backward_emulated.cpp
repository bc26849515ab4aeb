// csrc/cuda/backward.cu compiled for the CPU over the emulation (built with
// FUSED_RNN_EMULATED_CUDA, which makes loops.cuh take device_emulated.h).
#include "../cuda/backward.cu"
