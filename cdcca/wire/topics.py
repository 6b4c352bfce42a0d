"""Names on the wire: ROS 2 topics and the service of a robot, the Zenoh topics of the link, and the check that
a name is one rcl accepts.

The loop topics are absolute (``/cdcca/<topic>``) and so is the ``Ask`` service, so a node started in a namespace
(``-r __ns:=/r1``) still speaks on the names that zenoh-bridge-ros2dds maps to ``<robot_id>/cdcca/<topic>``
and that ``ros2 run cdcca_edge ask`` calls. Camera and prompt topics are parameters; these are their defaults.
"""

from __future__ import annotations

import re

from cdcca.wire import ADAPTER_STATUS, ANSWER, DIAGNOSTIC_ARRAY, UTS_ACK, UTS_TOKENS, WEIGHT_DELTA

DIAGNOSTICS = "diagnostics"  # link topic of a robot's (and the cloud's) status, every ~2 s
LINK_TOPICS = {
    "uts_tokens": UTS_TOKENS,  # robot -> cloud
    "uts_ack": UTS_ACK,  # cloud -> robot
    "weight_delta": WEIGHT_DELTA,  # cloud -> robot, latched
    "adapter_status": ADAPTER_STATUS,  # robot -> cloud
    "answer": ANSWER,  # robot -> any
    DIAGNOSTICS: DIAGNOSTIC_ARRAY,  # robot -> any; the cloud's own under the pseudo robot id CLOUD_ID
}  # the short names: Zenoh keys <robot_id>/cdcca/<name>, ROS topics /cdcca/<name>
ROBOT_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a robot id: the Zenoh key prefix and the ROS bridge namespace
ROBOT_ID_RULE = "letters, digits and _, not starting with a digit (it is the Zenoh key prefix and the bridge namespace)"
CLOUD_ID = "_cloud"  # the key prefix the cloud publishes its own diagnostics under (not a valid robot id)
# keys of the robot's DiagnosticStatus on the link that `cdcca status` reads (cdcca.edge.diagnostics)
ROBOT_STATUS_KEYS = ("adapter_version", "uplink_queued", "uplink_acked", "answers", "updates_applied",
                     "updates_rejected", "cloud")  # fmt: skip
ROS_TOPICS = {name: f"/cdcca/{name}" for name in LINK_TOPICS}
ASK_SERVICE = "/cdcca/ask"  # cdcca_msgs/srv/Ask
CAMERA_TOPIC = "/camera/camera/color/image_raw"  # realsense2_camera's name (namespace camera, node camera)
PROMPT_TOPIC = "/cdcca/prompt"  # std_msgs/String, one prompt per message
GROUND_TRUTH_TOPIC = "/cdcca/ground_truth"  # std_msgs/String, a JSON object per prompt (evaluation only)
CAMERA_FRAME_ID = "camera_color_optical_frame"  # realsense2_camera's colour optical frame
COMPRESSED_SUFFIX = "/compressed"  # image_transport's CompressedImage topic beside a camera topic

# rmw/validate_full_topic_name.h: RMW_TOPIC_MAX_NAME_LENGTH = 255 - 8 (room for the DDS prefixes and suffixes
# services need, "rq/" ... "Request"); rcl refuses a longer fully qualified name when the entity is created.
MAX_TOPIC_LENGTH = 247
_TOKENS = re.compile(r"^/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")  # fully qualified or relative


def topic_problem(name: str, namespace: str = "/") -> str | None:
    """Why rcl would refuse ``name`` as a topic (resolved in ``namespace``), or ``None`` when it accepts it."""
    if not isinstance(name, str) or not _TOKENS.match(name):
        return "must be a ROS topic name such as /camera/camera/color/image_raw (letters, digits, _ and /)"
    full = name if name.startswith("/") else namespace.rstrip("/") + "/" + name
    if len(full) > MAX_TOPIC_LENGTH:
        return f"must be at most {MAX_TOPIC_LENGTH} characters fully qualified (rmw's limit), is {len(full)}"
    return None
