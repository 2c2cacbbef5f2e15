"""Operations: status, demo, and tools for operators."""
