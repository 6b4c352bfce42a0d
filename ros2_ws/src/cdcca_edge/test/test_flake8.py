"""ament_flake8 on this package (ament_python template); skipped where ament_flake8 is missing."""

import pytest

main_with_errors = pytest.importorskip(
    'ament_flake8.main', reason='ament_flake8 is installed with ROS 2 Jazzy').main_with_errors


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    rc, errors = main_with_errors(argv=[])
    assert rc == 0, f'Found {len(errors)} code style errors / warnings:\n' + '\n'.join(errors)
