"""Change data capture: the events a change becomes, the bounded queue, the RabbitMQ publisher,
and the consumer (`fluxkv-cdc`) with its de-duplication."""
