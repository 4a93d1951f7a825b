"""The embedded MQTT broker (amqtt), hardened, and the same rules exported for other brokers."""
