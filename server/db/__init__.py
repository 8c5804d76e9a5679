"""Storage: the engine, the schema and its migrations, and the SQL every other wing composes."""
