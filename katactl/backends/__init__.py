"""How katactl reaches things: node transports and protocol clients."""
