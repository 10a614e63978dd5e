"""iotunnel's local proxy: a drop-in for the AWS IoT Secure Tunneling ``localproxy``."""

__version__ = "0.1.0"
