"""The warehouse: a ClickHouse (embedded chDB server or a real server/cluster) reached by URL."""
