"""
cdcca_edge: the robot's student MLLM as a ROS 2 lifecycle node, a thin port of EdgeRuntime.

Lifecycle (managed nodes, design.ros2.org/articles/node_lifecycle.html):

* configure: validate the parameters (cdcca.edge.params, derived from the config
  dataclasses), load the student and its persisted adapter (EdgeRuntime), create the
  publishers, the /diagnostics report and the /cdcca/ask service (cdcca_msgs/srv/Ask);
* activate: subscribe to the camera (sensor_msgs/Image, and CompressedImage on
  <camera_topic>/compressed when asked; sensor-data QoS), to prompts (std_msgs/String), to
  /cdcca/weight_delta (reliable, transient local, depth 1) and /cdcca/uts_ack, answer Ask,
  start the runtime's loop;
* deactivate: wait for the Asks being answered, stop the loop and drop the subscriptions
  (state is kept); cleanup: release the model and the service.

Ask lives from configure to cleanup and answers an empty answer at once while the node is
inactive (as Nav2's lifecycle servers reject goals while inactive): a service destroyed at
deactivate would lose the reply of an Ask in flight, which its client waits for in vain.

An invalid transition request is answered with success=false (rclpy 7 would raise it out
of the executor). A transition that raises is logged and goes through on_error. Callbacks
log and count what they raise (callback_errors on /diagnostics) instead of stopping the
executor. Messages of the core library's Python logging go to the node's logger, so they
reach /rosout once.

Everything travels as CDR bytes (raw=True subscriptions; rclpy publishers accept serialized
bytes), which is exactly what cdcca.wire produces and checks, so the node converts nothing
itself: subscriptions hand bytes to the runtime, and the runtime publishes through
RclpyPort. The node has no timer of its own but the diagnostics one.
"""

import functools
import logging
import math
import threading

from cdcca import wire
from cdcca.edge import params as edge_params
from cdcca.edge.diagnostics import EdgeDiagnostics, ERROR, OK, WARN
from cdcca.edge.frames import NoFrameError
from cdcca.wire import topics
from cdcca_msgs.msg import AdapterStatus, Answer, UtsAck, UtsTokens, WeightDelta
from cdcca_msgs.srv import Ask
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
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
LEVELS = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}
PORT_TYPES = {'answer': Answer, 'uts_tokens': UtsTokens, 'adapter_status': AdapterStatus}


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


class RclpyPort:
    """The runtime's port on lifecycle publishers: (topic, CDR bytes) -> /cdcca/<topic>."""

    topics = frozenset(PORT_TYPES)

    def __init__(self, publishers):
        self.publishers = publishers

    def publish(self, topic, data):
        publisher = self.publishers.get(topic)
        if publisher is None:
            raise RuntimeError(f'no publisher for {topic}: the node is not configured')
        publisher.publish(data)  # serialized CDR bytes


class RosLogHandler(logging.Handler):
    """Python logging of the core library (logger 'cdcca') into the node's ROS logger."""

    def __init__(self, logger):
        super().__init__()
        self.ros_logger = logger

    def emit(self, record):
        try:
            text = f'[{record.name}] {record.getMessage()}'
            if record.exc_info:
                text += '\n' + logging.Formatter().formatException(record.exc_info)
            level = record.levelno
            if level >= logging.ERROR:
                self.ros_logger.error(text)
            elif level >= logging.WARNING:
                self.ros_logger.warning(text)
            elif level >= logging.INFO:
                self.ros_logger.info(text)
            else:
                self.ros_logger.debug(text)
        except Exception:
            self.handleError(record)


ASK_DRAIN_S = 30.0  # how long deactivating waits for the Asks being answered


class EdgeNode(LifecycleNode):
    """Answers prompts about camera frames; uplink, hot-swaps and diagnostics by EdgeRuntime."""

    def __init__(self, **kwargs):
        super().__init__(edge_params.NODE_NAME, **kwargs)
        for spec in edge_params.PARAMETERS:
            if spec.kind == 'double':  # take 1 as well as 1.0 (-p ask_rate_hz:=1); params checks
                descriptor = ParameterDescriptor(description=spec.description, dynamic_typing=True)
            else:
                descriptor = ParameterDescriptor(description=spec.description,
                                                 type=PARAMETER_TYPES[spec.kind])
            self.declare_parameter(spec.name, spec.default, descriptor)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.runtime = None
        self.diagnostics = None
        self.callback_errors = 0
        self._port_publishers = {}  # not _publishers: rclpy's Node keeps its own list there
        self._diagnostics_publisher = None
        self._diagnostics_timer = None
        self._active = []  # subscriptions of the active state
        self._answering = MutuallyExclusiveCallbackGroup()  # Ask: one batch at a time
        self._ask_service = None  # from configure to cleanup
        self._asks = threading.Condition()  # guards the two below
        self._serving_asks = False  # active: Ask is answered
        self._asks_in_flight = 0
        self._loop = MutuallyExclusiveCallbackGroup()  # deltas and acks
        self._inputs = ReentrantCallbackGroup()
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._log_handler = RosLogHandler(self.get_logger())
        core_logger = logging.getLogger('cdcca')
        core_logger.addHandler(self._log_handler)
        core_logger.setLevel(logging.INFO)
        core_logger.propagate = False  # once, through ROS logging (and so on /rosout)
        change_state = self._service_change_state  # answer an invalid request instead of raising
        change_state.callback = self._checked_transition(change_state.callback)

    def _checked_transition(self, callback):
        def checked(request, response):
            try:
                return callback(request, response)
            except Exception as err:  # RCLError: no such transition from the current state
                state = self._state_machine.current_state[1]
                self.get_logger().warning(
                    f'refused lifecycle transition {request.transition.id} '
                    f'{request.transition.label!r} in state {state!r}: {err}')
                response.success = False
                return response
        return checked

    # ------------------------------------------------------------------------------ parameters
    def _values(self):
        return {spec.name: self.get_parameter(spec.name).value
                for spec in edge_params.PARAMETERS}

    def _on_set_parameters(self, parameters):
        configured = self.runtime is not None
        for parameter in parameters:
            spec = edge_params.SPECS.get(parameter.name)
            if spec is None:
                continue  # e.g. use_sim_time, qos_overrides.*
            value = list(parameter.value) if spec.kind == 'string_array' else parameter.value
            reason = edge_params.check_parameter(parameter.name, value)
            if reason is None and configured and spec.read_only:
                reason = (f'{parameter.name} takes effect at configure: '
                          'deactivate, cleanup, set it')
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        runtime = self.runtime
        if runtime is not None:
            for parameter in parameters:
                if parameter.name == 'batch_size':
                    runtime.config.batch_size = int(parameter.value)
                elif parameter.name == 'max_frame_age_s':
                    runtime.config.max_frame_age_s = float(parameter.value)
                elif parameter.name == 'prompts':
                    runtime.config.prompts = tuple(parameter.value)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------- lifecycle
    def _guarded(self, callback):
        """Wrap a subscription callback: log and count what it raises, never raise."""
        @functools.wraps(callback)
        def guarded(*args):
            try:
                return callback(*args)
            except Exception as err:
                self.callback_errors += 1
                self.get_logger().error(f'{callback.__name__} failed: {err!r}')
        return guarded

    @_transition
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.params = edge_params.validate_parameters(self._values())
            node_config, _ = edge_params.configs(self.params)
            self.runtime = edge_params.build_edge_runtime(self.params)
        except Exception as err:  # ParameterError, ModelNotFoundError...: stay unconfigured
            self.get_logger().error(f'configure failed: {err}')
            return TransitionCallbackReturn.FAILURE
        for name, msg_type in PORT_TYPES.items():
            self._port_publishers[name] = self.create_lifecycle_publisher(
                msg_type, topics.ROS_TOPICS[name], RELIABLE)
        self.runtime.connect(RclpyPort(self._port_publishers))
        self.diagnostics = EdgeDiagnostics(self.runtime, lambda: self.callback_errors)
        self._diagnostics_publisher = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diagnostics_timer = self.create_timer(
            node_config.diagnostics_period_s, self._guarded(self._publish_diagnostics),
            callback_group=self._loop, clock=self._steady)
        self._ask_service = self.create_service(Ask, topics.ASK_SERVICE, self._on_ask,
                                                callback_group=self._answering)
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
        runtime, camera, guarded = self.runtime, self.params['camera_topic'], self._guarded
        # a burst of prompts fits in the reader's history; past prompt_capacity the runtime counts
        prompts_qos = QoSProfile(depth=self.params['prompt_capacity'],
                                 reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.VOLATILE,
                                 history=HistoryPolicy.KEEP_LAST)
        self._active = []
        add = self._active.append  # one by one: if a creation raises, on_error releases the rest
        add(self.create_subscription(Image, camera, guarded(self._on_image),
                                     qos_profile_sensor_data, callback_group=self._inputs,
                                     raw=True))
        add(self.create_subscription(String, self.params['prompt_topic'],
                                     guarded(runtime.on_prompt), prompts_qos,
                                     callback_group=self._inputs, raw=True))
        add(self.create_subscription(WeightDelta, topics.ROS_TOPICS['weight_delta'],
                                     guarded(runtime.on_weight_delta), LATCHED,
                                     callback_group=self._loop, raw=True))
        add(self.create_subscription(UtsAck, topics.ROS_TOPICS['uts_ack'],
                                     guarded(runtime.on_ack), RELIABLE,
                                     callback_group=self._loop, raw=True))
        if self.params['subscribe_compressed']:
            add(self.create_subscription(
                CompressedImage, camera.rstrip('/') + topics.COMPRESSED_SUFFIX,
                guarded(self._on_compressed), qos_profile_sensor_data,
                callback_group=self._inputs, raw=True))
        runtime.start()
        with self._asks:
            self._serving_asks = True
        return TransitionCallbackReturn.SUCCESS

    def _drain_asks(self):
        """Wait for the Asks being answered (refused ones too) to return their replies."""
        with self._asks:
            if not self._asks.wait_for(lambda: self._asks_in_flight == 0, timeout=ASK_DRAIN_S):
                self.get_logger().warning(
                    f'{self._asks_in_flight} Ask(s) still in flight after {ASK_DRAIN_S:.0f} s')

    def _release_active(self):
        with self._asks:  # Asks from now on are refused; those being answered finish first
            self._serving_asks = False
        self._drain_asks()
        if self.runtime is not None:
            self.runtime.stop()  # a batch in flight finishes and is published first
        for entity in self._active:
            self.destroy_subscription(entity)
        self._active = []

    @_transition
    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_active()
        return super().on_deactivate(state)

    def _release_model(self):
        runtime, self.runtime, self.diagnostics = self.runtime, None, None
        if runtime is not None:
            runtime.stop()
            runtime.connect(None)  # nothing is published once the publishers go
        for publisher in self._port_publishers.values():
            self.destroy_lifecycle_publisher(publisher)
        self._port_publishers = {}
        if self._ask_service is not None:
            self._drain_asks()  # a refusal in flight still gets its reply
            self.destroy_service(self._ask_service)
            self._ask_service = None
        if self._diagnostics_timer is not None:
            self.destroy_timer(self._diagnostics_timer)
            self.destroy_publisher(self._diagnostics_publisher)
            self._diagnostics_timer = self._diagnostics_publisher = None
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

    def close(self):
        """Release everything and detach the core library's logging from this node."""
        self._release_active()
        self._release_model()
        logging.getLogger('cdcca').removeHandler(self._log_handler)

    # --------------------------------------------------------------------------------- streams
    def _on_image(self, data):
        self.runtime.on_camera(data, wire.IMAGE)

    def _on_compressed(self, data):
        self.runtime.on_camera(data, wire.COMPRESSED_IMAGE)

    def _on_ask(self, request, response):
        with self._asks:
            serving = self._serving_asks
            self._asks_in_flight += 1
        try:
            return self._answer_ask(request, response, serving)
        finally:
            with self._asks:
                self._asks_in_flight -= 1
                self._asks.notify_all()

    def _answer_ask(self, request, response, serving):
        runtime = self.runtime
        response.answer, response.entropy = '', math.nan
        response.adapter_version = runtime.backend.version if runtime is not None else 0
        try:
            if runtime is None:
                raise ValueError('cdcca_edge is not configured')
            if not serving:
                raise ValueError('cdcca_edge is inactive (activate it to answer)')
            image = None
            if request.image.width > 0:
                image = wire.decode(wire.IMAGE, serialize_message(request.image))
            answer = runtime.ask_one(request.prompt, image)
        except (NoFrameError, ValueError) as err:  # wire.WireError is a ValueError
            self.get_logger().warning(f'Ask not answered: {err}')
            return response
        except Exception as err:  # a service must answer; the executor must keep spinning
            self.callback_errors += 1
            self.get_logger().error(f'Ask failed: {err!r}')
            return response
        response.answer = answer.answer
        response.entropy = float(answer.entropy)
        response.adapter_version = int(answer.adapter_version)
        return response

    def _publish_diagnostics(self):
        diagnostics, publisher = self.diagnostics, self._diagnostics_publisher
        if diagnostics is None or publisher is None:
            return
        report = diagnostics.report()
        if not self._active:
            report.level, report.message = WARN, 'inactive: not answering'
        status = DiagnosticStatus(
            level=LEVELS[report.level], name=f'{self.get_name()}: cdcca_edge',
            message=report.message, hardware_id=self.params['robot_id'],
            values=[KeyValue(key=k, value=v) for k, v in report.values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        publisher.publish(array)


def main(args=None):
    """Run the node; with autostart:=true the launch file drives configure and activate."""
    rclpy.init(args=args)
    node = EdgeNode()
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    try:
        while rclpy.ok():
            try:
                executor.spin()
            except (KeyboardInterrupt, ExternalShutdownException):
                break
            except Exception as err:  # a callback that escaped every guard: log, keep serving
                node.get_logger().error(f'executor: {err!r}')
    finally:
        executor.shutdown(timeout_sec=10.0)  # let a batch in flight finish before the model goes
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
