"""Native kernels, compiled on first use with the machine's C compiler and called through :mod:`ctypes`.

Optional by construction: every kernel has a PyTorch path that computes the same numbers (up to float rounding),
used where no compiler is found, the build fails or ``FCMOE_NATIVE=0``. Kept out of :mod:`fcmoe.core` so the core
stays plain tensor math; the core calls in through :func:`consensus_read_kernel`.
"""

from fcmoe.native.consensus_kernel import ConsensusRead, consensus_read, consensus_read_kernel

__all__ = ["ConsensusRead", "consensus_read", "consensus_read_kernel"]
