"""ament_python package cdcca_edge (ROS 2 docs: "Creating a package", Python build type)."""

from glob import glob

from setuptools import find_packages, setup

package_name = 'cdcca_edge'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml', 'README.md']),
        ('share/' + package_name + '/launch', glob('launch/*.launch.py')),
        ('share/' + package_name + '/config', glob('config/*.yaml')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='CD-CCA maintainers',
    maintainer_email='maintainers@cdcca.dev',
    description='CD-CCA robot nodes around cdcca.edge.EdgeRuntime',
    license='Apache-2.0',
    extras_require={'test': ['pytest']},
    entry_points={
        'console_scripts': [
            'edge_node = cdcca_edge.edge_node:main',
            'ask = cdcca_edge.ask:main',
        ],
    },
)
