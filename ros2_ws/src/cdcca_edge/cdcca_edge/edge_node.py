"""cdcca_edge: the robot's student MLLM as a ROS 2 lifecycle node (a thin shell around EdgeGlue).

Lifecycle (managed nodes, design.ros2.org/articles/node_lifecycle.html):

* configure: validate the parameters, load the student and its persisted adapter
  (EdgeRuntime), create the publishers;
* activate: subscribe to the camera (sensor_msgs/Image, and CompressedImage on
  <camera_topic>/compressed when asked; sensor-data QoS), to prompts (std_msgs/String), to
  /cdcca/weight_delta (reliable, transient local, depth 1) and /cdcca/uts_ack, serve
  cdcca_msgs/srv/Ask, start the timers;
* deactivate: drop those again (answers stop, state is kept); cleanup: release the model.

A transition that raises is logged (rclpy would turn it into ERROR without a word), and
on_error releases everything. Stream callbacks log and count what they raise
(``callback_errors`` on /diagnostics) instead of letting it stop the executor. The node's
own timers run on the steady clock, so they keep firing under use_sim_time before /clock.

Everything travels as CDR bytes (raw=True subscriptions; rclpy publishers accept serialized
bytes), which is exactly what cdcca.wire produces and checks, so the node converts nothing
itself. Parameters are declared with descriptions and validated by cdcca.edge.ros_glue
(set-parameters callback, as in ros2/demos); defaults live in config/edge.yaml. QoS per
stream as rclpy.qos profiles.
"""

import functools
import math

from cdcca import wire
from cdcca.edge import ros_glue
from cdcca_msgs.msg import AdapterStatus, Answer, UtsAck, UtsTokens, WeightDelta
from cdcca_msgs.srv import Ask
from diagnostic_msgs.msg import DiagnosticStatus
from diagnostic_updater import Updater
from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, qos_profile_sensor_data, QoSProfile,
                       ReliabilityPolicy)
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE, history=HistoryPolicy.KEEP_LAST)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
PARAMETER_TYPES = {
    'string': ParameterType.PARAMETER_STRING, 'integer': ParameterType.PARAMETER_INTEGER,
    'double': ParameterType.PARAMETER_DOUBLE, 'bool': ParameterType.PARAMETER_BOOL,
    'string_array': ParameterType.PARAMETER_STRING_ARRAY,
}
LEVELS = {ros_glue.OK: DiagnosticStatus.OK, ros_glue.WARN: DiagnosticStatus.WARN,
          ros_glue.ERROR: DiagnosticStatus.ERROR}
LOOP_TYPES = {'answer': Answer, 'uts_tokens': UtsTokens, 'adapter_status': AdapterStatus}


def _transition(callback):
    """Log what a transition raises, then return ERROR so that on_error releases everything."""
    @functools.wraps(callback)
    def logged(self, state):
        try:
            return callback(self, state)
        except Exception as err:
            self.get_logger().error(f'{callback.__name__} failed: {err!r}')
            return TransitionCallbackReturn.ERROR
    return logged


class EdgeNode(LifecycleNode):
    """Answers prompts about camera frames; uplink, hot-swaps and diagnostics through EdgeGlue."""

    def __init__(self, **kwargs):
        super().__init__(ros_glue.NODE_NAME, **kwargs)
        for spec in ros_glue.PARAMETERS:
            if spec.kind == 'double':  # take 1 as well as 1.0 (-p ask_rate_hz:=1); ros_glue checks
                descriptor = ParameterDescriptor(description=spec.description, dynamic_typing=True)
            else:
                descriptor = ParameterDescriptor(description=spec.description,
                                                 type=PARAMETER_TYPES[spec.kind])
            self.declare_parameter(spec.name, spec.default, descriptor)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.runtime = None
        self.glue = None
        self._loop_publishers = {}  # not _publishers: rclpy's Node keeps its own list there
        self._active = []  # subscriptions, service and timers of the active state
        self._answering = MutuallyExclusiveCallbackGroup()  # one batch through the model at a time
        self._loop = MutuallyExclusiveCallbackGroup()  # deltas: off the answering thread
        self._inputs = ReentrantCallbackGroup()
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.diagnostics = Updater(self, period=self.get_parameter('diagnostics_period_s').value)
        self.diagnostics.setHardwareID(self.get_parameter('robot_id').value)
        self.diagnostics.add('cdcca_edge', self._diagnose)

    # ------------------------------------------------------------------------------ parameters
    def _values(self):
        return {spec.name: self.get_parameter(spec.name).value for spec in ros_glue.PARAMETERS}

    def _on_set_parameters(self, parameters):
        configured = self.runtime is not None
        for parameter in parameters:
            spec = ros_glue.SPECS.get(parameter.name)
            if spec is None:
                continue  # e.g. use_sim_time, qos_overrides.*
            value = list(parameter.value) if spec.kind == 'string_array' else parameter.value
            reason = ros_glue.check_parameter(parameter.name, value)
            if reason is None and configured and spec.read_only:
                reason = f'{parameter.name} takes effect at configure: deactivate, cleanup, set it'
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        if self.glue is not None:
            for parameter in parameters:
                if parameter.name == 'batch_size':
                    self.glue.batch_size = int(parameter.value)
                elif parameter.name == 'max_frame_age_s':
                    self.glue.max_frame_age_s = float(parameter.value)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------- lifecycle
    def _guarded(self, callback):
        """Wrap a subscription or timer callback: log and count what it raises, never raise."""
        @functools.wraps(callback)
        def guarded(*args):
            try:
                return callback(*args)
            except Exception as err:
                glue = self.glue
                if glue is not None:
                    glue.counters.callback_errors += 1
                self.get_logger().error(f'{callback.__name__} failed: {err!r}')
        return guarded

    @_transition
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.params = ros_glue.validate_parameters(self._values())
            self.runtime = ros_glue.build_edge_runtime(self.params)
        except Exception as err:  # ParameterError, ModelNotFoundError...: stay unconfigured
            self.get_logger().error(f'configure failed: {err}')
            return TransitionCallbackReturn.FAILURE
        for name, msg_type in LOOP_TYPES.items():
            self._loop_publishers[name] = self.create_lifecycle_publisher(
                msg_type, ros_glue.ROS_TOPICS[name], RELIABLE)
        self.glue = ros_glue.EdgeGlue(self.runtime, self._publish,
                                      batch_size=self.params['batch_size'],
                                      max_frame_age_s=self.params['max_frame_age_s'],
                                      carry_loop=True)
        self.get_logger().info(
            f"configured robot {self.params['robot_id']} at adapter version "
            f'{self.runtime.backend.version}')
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        # enable the lifecycle publishers first, so that no early answer is lost
        result = super().on_activate(state)
        if result != TransitionCallbackReturn.SUCCESS:
            return result
        glue, camera, guarded = self.glue, self.params['camera_topic'], self._guarded
        self._active = []
        add = self._active.append  # one by one: if a creation raises, on_error releases the rest
        add(self.create_subscription(Image, camera, guarded(self._on_image),
                                     qos_profile_sensor_data, callback_group=self._inputs,
                                     raw=True))
        add(self.create_subscription(String, self.params['prompt_topic'], guarded(glue.on_prompt),
                                     RELIABLE, callback_group=self._inputs, raw=True))
        add(self.create_subscription(WeightDelta, ros_glue.ROS_TOPICS['weight_delta'],
                                     guarded(glue.on_weight_delta), LATCHED,
                                     callback_group=self._loop, raw=True))
        add(self.create_subscription(UtsAck, ros_glue.ROS_TOPICS['uts_ack'], guarded(glue.on_ack),
                                     RELIABLE, callback_group=self._loop, raw=True))
        add(self.create_service(Ask, 'cdcca/ask', self._on_ask, callback_group=self._answering))
        add(self.create_timer(0.02, guarded(self._answer_pending),
                              callback_group=self._answering, clock=self._steady))
        add(self.create_timer(self.params['pump_every_s'], guarded(glue.tick),
                              callback_group=self._loop, clock=self._steady))
        if self.params['subscribe_compressed']:
            add(self.create_subscription(
                CompressedImage, camera.rstrip('/') + '/compressed', guarded(self._on_compressed),
                qos_profile_sensor_data, callback_group=self._inputs, raw=True))
        if self.params['ask_rate_hz'] > 0:
            add(self.create_timer(1.0 / self.params['ask_rate_hz'], guarded(self._ask_prompts),
                                  callback_group=self._answering, clock=self._steady))
        return TransitionCallbackReturn.SUCCESS

    def _release_active(self):
        for entity in self._active:
            if hasattr(entity, 'cancel'):  # a timer
                entity.cancel()
                self.destroy_timer(entity)
            elif hasattr(entity, 'srv_type'):
                self.destroy_service(entity)
            else:
                self.destroy_subscription(entity)
        self._active = []

    @_transition
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        return super().on_deactivate(state)

    def _release_model(self):
        for publisher in self._loop_publishers.values():
            self.destroy_lifecycle_publisher(publisher)
        self._loop_publishers = {}
        runtime, self.runtime, self.glue = self.runtime, None, None
        if runtime is not None:
            runtime.close()  # the uplink queue and adapter state are durable

    @_transition
    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_model()
        return TransitionCallbackReturn.SUCCESS

    @_transition
    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        self._release_model()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything after a transition raised (back to unconfigured)."""
        self.get_logger().error(f'error while {state.label}: releasing the model')
        try:
            self._release_active()
            self._release_model()
        except Exception as err:
            self.get_logger().error(f'release failed: {err!r}')
            return TransitionCallbackReturn.FAILURE  # to finalized
        return TransitionCallbackReturn.SUCCESS

    # --------------------------------------------------------------------------------- streams
    def _publish(self, topic, data):
        self._loop_publishers[topic].publish(data)  # serialized CDR bytes

    def _on_image(self, data):
        self.glue.on_camera(data, wire.IMAGE)

    def _on_compressed(self, data):
        self.glue.on_camera(data, wire.COMPRESSED_IMAGE)

    def _answer_pending(self):
        glue = self.glue  # cleanup may clear it from another thread
        while glue is not None and glue.pending() and glue.answer_pending():
            pass

    def _ask_prompts(self):
        glue = self.glue
        if glue is not None:
            glue.ask_about_latest(self.get_parameter('prompts').value)

    def _on_ask(self, request, response):
        glue, runtime = self.glue, self.runtime
        response.answer, response.entropy = '', math.nan
        response.adapter_version = runtime.backend.version if runtime is not None else 0
        try:
            if glue is None:
                raise ValueError('cdcca_edge is not configured')
            image = None
            if request.image.width > 0:
                image = wire.decode(wire.IMAGE, serialize_message(request.image))
            answer = glue.ask(request.prompt, image)
        except (ros_glue.NoFrameError, ValueError) as err:  # wire.WireError is a ValueError
            self.get_logger().warning(f'Ask not answered: {err}')
            return response
        except Exception as err:  # a service must answer; the executor must keep spinning
            if glue is not None:
                glue.counters.callback_errors += 1
            self.get_logger().error(f'Ask failed: {err!r}')
            return response
        response.answer = answer.answer
        response.entropy = float(answer.entropy)
        response.adapter_version = int(answer.adapter_version)
        return response

    def _diagnose(self, stat):
        glue = self.glue
        if glue is None:
            stat.summary(DiagnosticStatus.WARN, 'unconfigured: no model loaded')
            return stat
        report = glue.diagnostics()
        if not self._active:
            report.level, report.message = ros_glue.WARN, 'inactive: not answering'
        stat.summary(LEVELS[report.level], report.message)
        for key, value in report.values.items():
            stat.add(key, value)
        return stat


def main(args=None):
    """Run the node; with autostart:=true the launch file drives configure and activate."""
    rclpy.init(args=args)
    node = EdgeNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown(timeout_sec=10.0)  # let a batch in flight finish before the model goes
        node._release_active()
        node._release_model()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
