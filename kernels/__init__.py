# Triton kernels (lowbit.kernels): filled by the Triton backend issue.
