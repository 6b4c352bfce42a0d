"""ament_pep257 on this package (ament_python template); skipped where ament_pep257 is missing."""

import pytest

main = pytest.importorskip(
    'ament_pep257.main', reason='ament_pep257 is installed with ROS 2 Jazzy').main


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    rc = main(argv=['.', 'test'])
    assert rc == 0, 'Found code style errors / warnings'
