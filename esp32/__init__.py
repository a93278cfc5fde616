"""ESP32 pulse reader: MicroPython firmware (main.py) and its pure logic (pulse_logic.py).

On the device the files sit at the root of the filesystem and import each
other as top-level modules; this package only lets CPython (tests and
simulators/esp32.py) import esp32.pulse_logic. It is not copied to the device.
"""
