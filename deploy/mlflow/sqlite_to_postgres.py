"""Copy one of MLflow's SQLite stores into an empty PostgreSQL database, once.

    python sqlite_to_postgres.py mlflow|basic_auth sqlite:///PATH.db  < target-URI

Run with MLflow's own python (its venv), the server stopped (deploy/testbed/mlflow.sh
start does it for a testbed made when MLflow kept its stores in SQLite). The target
URI comes on stdin: it holds the database password. MLflow makes the target's
schema (at the head revision of the installed MLflow, which must be the source's
too), then every row of every table is copied in one transaction: all of it or
nothing, so a failed copy can simply be run again. Ids stay as they were (the
gateway keeps experiment ids), and each id sequence continues after the copied ids.
"""

import sys

from sqlalchemy import Boolean, MetaData, create_engine, func, select, text

# MLflow's alembic bookkeeping: made by MLflow for the target, never copied
VERSION_TABLES = {"mlflow": "alembic_version", "basic_auth": "alembic_version_auth"}
CHUNK = 5000


def make_schema(kind: str, uri: str) -> None:
    if kind == "mlflow":
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        SqlAlchemyStore(uri, "/nonexistent")  # creates the tables and MLflow's Default experiment
    else:
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore
        SqlAlchemyStore().init_db(uri)


def revision(connection, table: str) -> str:
    return connection.execute(text(f"SELECT version_num FROM {table}")).scalar_one()


def copy(kind: str, source_uri: str, target_uri: str) -> None:
    make_schema(kind, target_uri)
    source, target = create_engine(source_uri), create_engine(target_uri)
    source_tables, target_tables = MetaData(), MetaData()
    source_tables.reflect(source)
    target_tables.reflect(target)
    version_table = VERSION_TABLES[kind]
    tables = [t for t in target_tables.sorted_tables if t.name != version_table]
    with source.connect() as reading, target.begin() as writing:
        if revision(reading, version_table) != revision(writing, version_table):
            raise SystemExit(f"{source_uri} is at revision {revision(reading, version_table)}, the installed MLflow "
                             f"at {revision(writing, version_table)}: start the old server once with this MLflow "
                             "(it upgrades its store), then copy")
        if kind == "basic_auth" and writing.execute(select(func.count()).select_from(target_tables.tables["users"])).scalar():
            raise SystemExit("the target already has MLflow users: not copying over them")
        if kind == "mlflow" and writing.execute(select(func.count()).select_from(target_tables.tables["runs"])).scalar():
            raise SystemExit("the target already has MLflow runs: not copying over them")
        for table in reversed(tables):  # what MLflow's schema step put there (the Default experiment, roles)
            writing.execute(table.delete())
        copied = {}
        for table in tables:
            if table.name not in source_tables.tables:
                continue
            columns = [c for c in table.columns if c.name in source_tables.tables[table.name].c]
            booleans = {c.name for c in columns if isinstance(c.type, Boolean)}  # SQLite keeps 0 and 1
            rows = reading.execution_options(stream_results=True).execute(
                select(*(source_tables.tables[table.name].c[c.name] for c in columns)))
            copied[table.name] = 0
            while chunk := rows.mappings().fetchmany(CHUNK):
                writing.execute(table.insert(), [{name: bool(value) if name in booleans and value is not None else value
                                                  for name, value in row.items()} for row in chunk])
                copied[table.name] += len(chunk)
        for table in tables:  # new ids after the copied ones
            for column in table.primary_key.columns:
                sequence = writing.execute(text("SELECT pg_get_serial_sequence(:t, :c)"),
                                           {"t": f'"{table.name}"', "c": column.name}).scalar()
                if sequence:
                    writing.execute(text(f'SELECT setval(:s, COALESCE((SELECT max("{column.name}") FROM '
                                         f'"{table.name}"), 0) + 1, false)'), {"s": sequence})
    print(f"copied {kind}: " + ", ".join(f"{name} {count}" for name, count in copied.items() if count))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in VERSION_TABLES:
        raise SystemExit(__doc__)
    copy(sys.argv[1], sys.argv[2], sys.stdin.readline().strip())
