"""The cloud trainer sidecar: receives uncertain visual tokens from robots, distills a large teacher into a
cloud copy of each robot's student, and publishes compressed weight deltas. Built on ``cdcca``."""
