"""The broker wing: the AMQP 1.0 connection kept alive in its thread (``connection``), the AMQP
1.0 message codec, the address templates and topology (``topology``), RabbitMQ administration
over AMQP 0-9-1 (``admin``) and the private development node (``node``).

It may import proton, pika and the root; never another wing. The RabbitMQ 3.x specifics live
here (docs/wire.md, "Addresses and topology").
"""
