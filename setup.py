"""Build script for colcon, which builds ament_python packages (package.xml beside this file) through setup.py.

Everything is declared in pyproject.toml except ``python_requires``: colcon-python-setup-py reads the
``setup()`` keywords back with ``ast.literal_eval``, and the ``SpecifierSet`` that setuptools makes from
``requires-python`` is not a literal, so the constraint is given here as a string. The data files are the
ament index marker and package.xml, which ``ros2 pkg`` and colcon-ros look for.
"""

from setuptools import setup

setup(
    python_requires=">=3.11",
    data_files=[  # what an ament_python package installs for the ament index (colcon-ros warns without them)
        ("share/ament_index/resource_index/packages", ["ros2_ws/resource/cdcca"]),
        ("share/cdcca", ["package.xml"]),
    ],
)
