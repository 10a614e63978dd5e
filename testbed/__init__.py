"""The loopback world that the tests, the demo and the benchmarks share.

A throw-away PKI (:mod:`testbed.pki`), iotunnel's parts as real processes (:mod:`testbed.harness`),
mosquitto (:mod:`testbed.mqtt`), sshd (:mod:`testbed.sshd`), tinyproxy (:mod:`testbed.httpproxy`),
echo/HTTP/bulk servers
(:mod:`testbed.servers`) and their clients (:mod:`testbed.clients`), the service's management API
driven by the AWS CLI and boto3 (:mod:`testbed.awsapi`) and a scripted fake tunnel service
(:mod:`testbed.fake_service`).

It is used from the checkout (run from its top, or with it on ``PYTHONPATH``) and is neither in
the wheel nor in the .deb: nothing on a device imports it.
"""
