"""Tape: drives and changers, on-tape formats, media, pools and the catalog.

Layers (the shape of PBS's ``src/tape/``), each only using the ones below::

    pool_writer / pool_reader   write a pool's media set; read tapes back, scan, rebuild
    library                     a changer + a drive: load by label, labels, cleaning
    catalog / media             the on-disk catalog; pools, media sets, rotation (pure)
    formats                     archives of MAC-checked frames in fixed blocks
    drive                       the TapeDrive and Changer interfaces
    virtual | mtx | sgio        back ends: file-backed (demo), mtx+mt programs, SG_IO

``devices.open_library(spec)`` opens a back end from ``virtual:DIR``, ``mtx:CHANGER,DRIVE``
or ``sg:CHANGER,DRIVE``. Jobs (vmdr.jobs.tape, tape_media) sit above all of this.
"""
