"""Make a venv holding the ROS 2 binary wheels usable for building ``ros2_ws`` and running its nodes.

``point-exports``: the wheels' ``share/*/cmake/*rosidl_generator_py*Export.cmake`` files carry the wheel
builder's Python and numpy include directories; a ``rosidl_generate_interfaces`` build against them fails until
they name this interpreter's (``sysconfig``) and this numpy's. Rewritten in place, idempotent.

``colcon ARGS``: colcon run by this interpreter (so ament_python packages are built for it), without a console
script of its own (colcon-core may come from the core venv through a ``.pth``).
"""

import glob
import re
import sys
import sysconfig


def point_exports() -> int:
    import numpy

    includes = f"{sysconfig.get_paths()['include']};{numpy.get_include()}"
    changed = 0
    for path in glob.glob(f"{sys.prefix}/share/*/cmake/*rosidl_generator_py*Export.cmake"):
        with open(path) as handle:
            text = handle.read()
        new = re.sub(r'INTERFACE_INCLUDE_DIRECTORIES "[^"]*"', f'INTERFACE_INCLUDE_DIRECTORIES "{includes}"', text)
        if new != text:
            with open(path, "w") as handle:
                handle.write(new)
            changed += 1
    print(f"rosidl_generator_py exports pointed at {includes}: {changed} rewritten")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["point-exports"]:
        sys.exit(point_exports())
    if sys.argv[1:2] == ["colcon"]:
        from colcon_core.command import main

        sys.exit(main(argv=sys.argv[2:]))
    sys.exit("usage: wheel_env.py point-exports | colcon ARGS")
