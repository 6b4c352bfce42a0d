"""CD-CCA robot nodes: thin rclpy ports of cdcca.edge.EdgeRuntime."""
