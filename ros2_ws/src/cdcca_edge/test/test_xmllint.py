"""ament_xmllint on package.xml; skipped where ament_xmllint is missing."""

import pytest

main = pytest.importorskip(
    'ament_xmllint.main', reason='ament_xmllint is installed with ROS 2 Jazzy').main


@pytest.mark.linter
@pytest.mark.xmllint
def test_xmllint():
    rc = main(argv=[])
    assert rc == 0, 'Found errors'
