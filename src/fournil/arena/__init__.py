"""The arena: models answer the same prompt side by side, people and judge models vote, the votes rank the models and
become preference pairs for alignment."""
