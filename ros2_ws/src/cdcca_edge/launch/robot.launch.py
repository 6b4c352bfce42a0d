"""
The robot: cdcca_edge (lifecycle, auto-activated), optional RealSense and Zenoh bridge.

    ros2 launch cdcca_edge robot.launch.py robot_id:=r1 model:=/path/to/checkpoints \
        start_camera:=true start_bridge:=true cloud_endpoint:=tcp/CLOUD_IP:7447

Every argument is described (`ros2 launch cdcca_edge robot.launch.py --show-args`), as in
realsense-ros's rs_launch.py. The lifecycle node is configured then activated by launch events, the
pattern of launch_ros's lifecycle examples (ChangeState + OnStateTransition). The bridge runs with
namespace /<robot_id>, so the ROS topic /cdcca/<topic> becomes the Zenoh key
<robot_id>/cdcca/<topic> that `cdcca cloud` speaks (zenoh-plugin-ros2dds). The bridge listens
only on an ephemeral loopback port (bridge_listen), so it never takes 7447 from a cloud on the
same host. robot_id, model, trust_dir and camera_topic override params_file and always
stay strings (launch_ros would read robot_id:=7 as an integer). model is the model folder's one
name across CD-CCA (`cdcca edge --model`); the older model_path:= still works when model is empty.
"""

from launch import LaunchDescription
from launch.actions import (DeclareLaunchArgument, EmitEvent, ExecuteProcess,
                            IncludeLaunchDescription, RegisterEventHandler)
from launch.conditions import IfCondition
from launch.events import matches_action
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitution import Substitution
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare
from lifecycle_msgs.msg import Transition

ARGUMENTS = [
    ('robot_id', 'r1', 'robot name: UtsTokens.robot_id, the bridge namespace and the Zenoh key '
                       'prefix <robot_id>/cdcca/<topic>'),
    ('model', '', 'model folder holding student/ (cdcca pretrain output, as cdcca edge --model); '
                  'empty: model_path, else the tiny preset in the CD-CCA cache'),
    ('model_path', '', 'older name of model, still accepted (model wins when both are set)'),
    ('trust_dir', '', "trust store of the cloud's public keys (cdcca keys trust); empty: cache"),
    ('camera_topic', '/camera/camera/color/image_raw', 'sensor_msgs/Image topic to answer about'),
    ('params_file', PathJoinSubstitution([FindPackageShare('cdcca_edge'), 'config', 'edge.yaml']),
     'YAML parameter file of the cdcca_edge node (defaults: config/edge.yaml)'),
    ('start_camera', 'false', 'also start realsense2_camera (rs_launch.py, namespace camera)'),
    ('start_bridge', 'false', 'also start zenoh-bridge-ros2dds with namespace /<robot_id>'),
    ('cloud_endpoint', 'tcp/127.0.0.1:7447',
     'Zenoh endpoint of the cloud (cdcca cloud --endpoint)'),
    ('bridge_listen', 'tcp/127.0.0.1:0',
     'Zenoh endpoint the bridge listens on (its router default, tcp/0.0.0.0:7447, would clash '
     'with a cloud on this host)'),
    ('bridge_executable', 'zenoh-bridge-ros2dds',
     'path or name of the zenoh-bridge-ros2dds binary'),
    ('autostart', 'true', 'configure and activate cdcca_edge at launch (false: drive it with '
                          'ros2 lifecycle set)'),
    ('use_sim_time', 'false', 'use /clock (true when replaying a bag with --clock)'),
    ('log_level', 'info', 'log level of cdcca_edge'),
]


class ModelFolder(Substitution):
    """model:=, or the older model_path:= when model is empty (launch's Substitution interface)."""

    def describe(self):
        """Text shown for this substitution in launch's descriptions."""
        return 'model or model_path'

    def perform(self, context):
        """Model:=, or model_path:= when model is empty."""
        return (LaunchConfiguration('model').perform(context)
                or LaunchConfiguration('model_path').perform(context))


def generate_launch_description():
    """Declare the arguments, the edge node, its lifecycle events, the camera and the bridge."""
    config = {name: LaunchConfiguration(name) for name, _, _ in ARGUMENTS}
    edge = LifecycleNode(
        package='cdcca_edge', executable='edge_node', name='cdcca_edge', namespace='',
        output='screen',
        parameters=[config['params_file'], {
            **{name: ParameterValue(config[argument], value_type=str) for name, argument in (
                ('robot_id', 'robot_id'), ('trust_dir', 'trust_dir'),
                ('camera_topic', 'camera_topic'))},
            'checkpoints': ParameterValue(ModelFolder(), value_type=str),
            'use_sim_time': ParameterValue(config['use_sim_time'], value_type=bool),
        }],
        arguments=['--ros-args', '--log-level', config['log_level']],
    )
    configure = EmitEvent(event=ChangeState(
        lifecycle_node_matcher=matches_action(edge),
        transition_id=Transition.TRANSITION_CONFIGURE), condition=IfCondition(config['autostart']))
    activate = RegisterEventHandler(OnStateTransition(  # only after configure, not deactivate
        target_lifecycle_node=edge, start_state='configuring', goal_state='inactive',
        entities=[EmitEvent(event=ChangeState(
            lifecycle_node_matcher=matches_action(edge),
            transition_id=Transition.TRANSITION_ACTIVATE))]),
        condition=IfCondition(config['autostart']))
    camera = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution(
            [FindPackageShare('realsense2_camera'), 'launch', 'rs_launch.py'])),
        condition=IfCondition(config['start_camera']))
    bridge = ExecuteProcess(
        cmd=[config['bridge_executable'], '--namespace', ['/', config['robot_id']],
             '--connect', config['cloud_endpoint'], '--listen', config['bridge_listen']],
        output='screen', condition=IfCondition(config['start_bridge']))
    return LaunchDescription([
        *[DeclareLaunchArgument(name, default_value=default, description=description)
          for name, default, description in ARGUMENTS],
        activate, edge, configure, camera, bridge,
    ])
