"""katactl: operate Kata Containers nodes (sandboxes, balloons, vmcores,
host isolation, A/B upgrades, rolling node operations)."""

__version__ = "0.1.0"
