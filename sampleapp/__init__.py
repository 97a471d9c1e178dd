"""A sample AP server (`carousel app`) for the demo, the tests and the Vagrant lab."""
