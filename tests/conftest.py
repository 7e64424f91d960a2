"""Fixtures shared across test modules: the real Redis and RabbitMQ servers the tests start."""

pytest_plugins = ("tests.redis_server", "tests.rabbitmq_server")
