"""
ask: call the robot's cdcca_msgs/srv/Ask once and print the answer.

    ros2 run cdcca_edge ask "what digit is this?"

The request carries no image (width 0), so the node answers about its latest camera frame.
"""

import sys

from cdcca.wire.topics import ASK_SERVICE
from cdcca_msgs.srv import Ask
import rclpy
from rclpy.node import Node


def ask_once(node: Node, prompt: str, service: str = ASK_SERVICE, timeout_s: float = 30.0):
    """Call the Ask service with ``prompt``; returns the response or None on timeout."""
    client = node.create_client(Ask, service)
    if not client.wait_for_service(timeout_sec=timeout_s):
        node.get_logger().error(f'{service} is not available; is cdcca_edge active?')
        return None
    future = client.call_async(Ask.Request(prompt=prompt))
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout_s)
    return future.result()


def main(args=None):
    """Ask the prompt given on the command line (default: what is in the picture?)."""
    rclpy.init(args=args)
    argv = rclpy.utilities.remove_ros_args(sys.argv)[1:]
    node = Node('cdcca_ask')
    try:
        response = ask_once(node, ' '.join(argv) or 'what is in the picture?')
        if response is None:
            sys.exit(1)
        print(f'{response.answer}  (entropy {response.entropy:.3f}, '
              f'adapter version {response.adapter_version})')
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
