"""Tests of the broker wing (relay/broker/): codec, the private node, what consumers see on
the wire, link restarts."""
