"""iotunnel's local proxy: a drop-in for the AWS IoT Secure Tunneling ``localproxy``."""
