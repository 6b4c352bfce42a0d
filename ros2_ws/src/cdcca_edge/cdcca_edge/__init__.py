"""CD-CCA robot nodes: thin rclpy shells; the logic lives in cdcca.edge.ros_glue."""
