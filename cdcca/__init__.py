"""CD-CCA: cloud-device collaborative continual adaptation for multimodal LLMs.

Implements Wang, Liu, Li et al., "Cloud-Device Collaborative Learning for Multimodal Large Language Models"
(CVPR 2024): uncertainty-guided token sampling on the device (UTS), adapter-based knowledge distillation in
the cloud (AKD) and dynamic weight compression of the update sent back (DWC). This package is the core
library; it never imports ROS.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend announces at import that it could not fetch an optional kernel from a model hub;
# CD-CCA never fetches at run time and does not use that kernel (NF4 here only quantises deltas).
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
