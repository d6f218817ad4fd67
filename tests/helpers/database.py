"""PostgreSQL for tests: the testbed's role (deploy/testbed/postgres.sh) makes
one database per test and drops it after, so runs never see each other's rows."""
import os
import uuid

import psycopg
from sqlalchemy.engine import make_url


class Postgres:
    def __init__(self, url):
        self.base = make_url(url)
        self.created = []

    @classmethod
    def from_environment(cls):
        url = os.environ.get("M2D_TEST_POSTGRES_URL")
        if not url:
            raise RuntimeError("M2D_TEST_POSTGRES_URL is not set: run the suite with `make test` "
                               "(deploy/testbed/postgres.sh makes the role, up.sh writes gateway.env)")
        return cls(url)

    def url(self, name):
        return self.base.set(database=name).render_as_string(hide_password=False)

    def _admin(self):
        conninfo = self.base.set(drivername="postgresql").render_as_string(hide_password=False)
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=10)

    def create(self, template=None):
        """A new database (a copy of ``template``, one of ours, if given); its name."""
        name = f"m2d_test_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        self.created.append(name)
        return name

    def drop(self, name):
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def drop_all(self):
        for name in list(self.created):
            self.drop(name)
