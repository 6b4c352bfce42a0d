"""
Replay a bag through the robot graph: `ros2 bag play` into cdcca_edge (and the cloud).

    cdcca make-bag /tmp/stream_bag --limit 20
    ros2 launch launch/replay.launch.py bag:=/tmp/stream_bag start_cloud:=true start_bridge:=true

The bag (made by `cdcca make-bag`) holds /camera/camera/color/image_raw (sensor_msgs/Image) and
/cdcca/prompt (std_msgs/String); cdcca_edge answers every prompt about the frame before it and
publishes /cdcca/answer. Offline adaptation is the same loop as on a robot. Every argument is
described (`--show-args`).
"""

from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription,
                            TimerAction)
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, ThisLaunchFileDir
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = [
    ('bag', None, 'rosbag2 directory written by `cdcca make-bag` (required)'),
    ('rate', '1.0', 'playback rate of ros2 bag play'),
    ('start_delay_s', '5.0',
     'seconds to wait before playing, so the node is configured and active'),
    ('robot_id', 'r1', 'robot name (see robot.launch.py)'),
    ('model_path', '', 'checkpoint directory holding student/; empty: the cache default'),
    ('trust_dir', '', "trust store of the cloud's public keys; empty: the cache default"),
    ('start_bridge', 'false', 'also start zenoh-bridge-ros2dds (see robot.launch.py)'),
    ('cloud_endpoint', 'tcp/127.0.0.1:7447', 'Zenoh endpoint of the cloud'),
    ('start_cloud', 'false', 'also start `cdcca cloud` (cloud.launch.py) on cloud_endpoint'),
]


def generate_launch_description():
    """Declare the arguments, include the robot (and cloud), then play the bag."""
    config = {name: LaunchConfiguration(name) for name, _, _ in ARGUMENTS}
    robot = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution(
            [FindPackageShare('cdcca_edge'), 'launch', 'robot.launch.py'])),
        launch_arguments={
            'robot_id': config['robot_id'], 'model_path': config['model_path'],
            'trust_dir': config['trust_dir'], 'start_bridge': config['start_bridge'],
            'cloud_endpoint': config['cloud_endpoint'], 'start_camera': 'false',
        }.items())
    cloud = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution(
            [ThisLaunchFileDir(), 'cloud.launch.py'])),
        launch_arguments={'endpoint': config['cloud_endpoint']}.items(),
        condition=IfCondition(config['start_cloud']))
    play = TimerAction(period=config['start_delay_s'], actions=[ExecuteProcess(
        cmd=['ros2', 'bag', 'play', config['bag'], '--rate', config['rate'], '--delay', '2'],
        output='screen')])  # --delay: give discovery time, or the first frames go to no one
    return LaunchDescription([
        *[DeclareLaunchArgument(name, default_value=default, description=description)
          for name, default, description in ARGUMENTS],
        cloud, robot, play,
    ])
