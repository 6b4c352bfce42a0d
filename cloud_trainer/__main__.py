"""``python -m cloud_trainer [args]`` is ``cdcca cloud [args]`` (also the entry point under ``torchrun``)."""

import sys

from cdcca.cli import main

sys.exit(main(["cloud", *sys.argv[1:]]))
