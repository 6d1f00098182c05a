"""A small LMS-like schema with realistic data, for PostgreSQL round trips."""

from __future__ import annotations

import os
from typing import Any

import psycopg

TABLES = ["institutions", "users", "courses", "enrolments", "submissions"]

SCHEMA = """
CREATE TABLE institutions (id serial PRIMARY KEY, name text NOT NULL, tier text NOT NULL);
CREATE TABLE users (id serial PRIMARY KEY, institution_id int REFERENCES institutions(id),
                    email text UNIQUE NOT NULL, display_name text, created_at timestamptz);
CREATE TABLE courses (id serial PRIMARY KEY, institution_id int REFERENCES institutions(id),
                      title text NOT NULL, syllabus text);
CREATE TABLE enrolments (user_id int REFERENCES users(id), course_id int REFERENCES courses(id),
                         role text NOT NULL, PRIMARY KEY (user_id, course_id));
CREATE TABLE submissions (id bigserial PRIMARY KEY, user_id int REFERENCES users(id),
                          course_id int REFERENCES courses(id), body text, attachment bytea,
                          grade numeric(5,2), submitted_at timestamptz);
CREATE INDEX ON submissions (course_id);
CREATE VIEW course_sizes AS SELECT course_id, count(*) AS n FROM enrolments GROUP BY course_id;
"""


def populate(dsn: str, scale: int = 1) -> None:
    """Create the schema and fill it; `scale` multiplies the row counts."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("INSERT INTO institutions (name, tier) VALUES "
                     "('Université de Genève', 'paid'), ('北京大学', 'paid'), "
                     "('Springfield Community College', 'free')")
        conn.execute(
            "INSERT INTO users (institution_id, email, display_name, created_at) "
            "SELECT 1 + i %% 3, 'user' || i || '@example.edu', 'Student ' || i || ' — ñ', "
            "'2026-01-01'::timestamptz + i * interval '1 hour' "
            "FROM generate_series(1, %s) i", (200 * scale,))
        conn.execute(
            "INSERT INTO courses (institution_id, title, syllabus) "
            "SELECT 1 + i %% 3, 'Course ' || i, repeat('Week plan. ', 50) "
            "FROM generate_series(1, %s) i", (20 * scale,))
        conn.execute(
            "INSERT INTO enrolments SELECT u.id, c.id, CASE WHEN u.id % 17 = 0 "
            "THEN 'teacher' ELSE 'student' END FROM users u JOIN courses c "
            "ON (u.id + c.id) % 4 = 0")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO submissions (user_id, course_id, body, attachment, grade, "
                "submitted_at) VALUES (%s, %s, %s, %s, %s, now())",
                [(1 + i % (200 * scale), 1 + i % (20 * scale), f"Essay {i}: " + "lorem " * 40,
                  os.urandom(512), (i % 100) / 1.5) for i in range(300 * scale)])


def table_rows(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every LMS table, in a stable order."""
    with psycopg.connect(dsn) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in TABLES}
