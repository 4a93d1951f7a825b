"""The herald command: composes the publisher, the broker and the agent."""
