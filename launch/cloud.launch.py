"""
The cloud sidecar: `cdcca cloud` as a launched process (it speaks Zenoh, not ROS).

    ros2 launch launch/cloud.launch.py endpoint:=tcp/0.0.0.0:7447

Robots reach it through zenoh-bridge-ros2dds (robot.launch.py start_bridge:=true) or `cdcca edge`.
Every argument is described (`ros2 launch launch/cloud.launch.py --show-args`).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration

ARGUMENTS = [
    ('endpoint', 'tcp/127.0.0.1:7447', 'Zenoh endpoint the cloud listens on'),
    ('cdcca_executable', 'cdcca',
     'the cdcca command of the environment that holds the core library'),
    ('extra_args', '', 'further `cdcca cloud` options as one string, e.g. "--round-size 64"'),
]


def generate_launch_description():
    """Declare the arguments and run `cdcca cloud --endpoint ENDPOINT`."""
    config = {name: LaunchConfiguration(name) for name, _, _ in ARGUMENTS}
    cloud = ExecuteProcess(
        cmd=[config['cdcca_executable'], 'cloud', '--endpoint', config['endpoint'],
             config['extra_args']],
        output='screen', shell=True, sigterm_timeout='20')
    return LaunchDescription([
        *[DeclareLaunchArgument(name, default_value=default, description=description)
          for name, default, description in ARGUMENTS],
        cloud,
    ])
