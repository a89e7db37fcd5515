"""hbd.retire: big containers let go of a slice per loop turn, in virtual time."""

from __future__ import annotations

import weakref

from hbd.retire import Retirer


def test_containers_are_emptied_a_slice_per_turn_in_order(vloop) -> None:
    r = Retirer(vloop, slice_=100)
    big = {i: object() for i in range(250)}
    items = list(range(120))
    r.retire(big)
    r.retire(items)
    r.retire([])  # nothing to do
    sizes = []
    while len(r):
        vloop.run_once(0)
        sizes.append((len(big), len(items)))
    assert sizes == [(150, 120), (50, 120), (0, 70), (0, 0)]


def test_close_lets_go_of_the_rest_at_once(vloop) -> None:
    class Thing:
        pass

    r = Retirer(vloop, slice_=10)
    things = [Thing() for _ in range(25)]
    probe = weakref.ref(things[0])  # the last freed: a slice goes from the end
    r.retire(things)
    vloop.run_once(0)
    vloop.run_once(0)
    assert len(things) == 5 and probe() is not None
    r.close()
    del things
    assert probe() is None
