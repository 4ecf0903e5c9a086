# Makes one small image of each source format for the formats_open C test,
# with qemu-img and qemu-io (the bytes are qemu's patterns, known to the
# test as constants). Run as a ctest fixture:
#   cmake -DQEMU_IMG=... -DQEMU_IO=... -DOUT_DIR=... -P make_format_images.cmake
foreach(var QEMU_IMG QEMU_IO OUT_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "make_format_images.cmake needs -D${var}=...")
  endif()
endforeach()

file(REMOVE_RECURSE "${OUT_DIR}")
file(MAKE_DIRECTORY "${OUT_DIR}")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${ARGN} failed (${rc}): ${err}")
  endif()
endfunction()

# name  qemu-format  create-options
set(images
  "disk.raw|raw|"
  "disk.vdi|vdi|"
  "disk.hdd|parallels|"
  "disk.vhd|vpc|subformat=dynamic,force_size=on"
  "disk.vhdx|vhdx|block_size=1M"
  "disk.qcow2|qcow2|cluster_size=65536"
  "disk.vmdk|vmdk|subformat=monolithicSparse")
foreach(entry IN LISTS images)
  string(REPLACE "|" ";" fields "${entry}")
  list(GET fields 0 name)
  list(GET fields 1 format)
  list(LENGTH fields n)
  set(opts "")
  if(n GREATER 2)
    list(GET fields 2 o)
    if(o)
      set(opts -o "${o}")
    endif()
  endif()
  set(path "${OUT_DIR}/${name}")
  run("${QEMU_IMG}" create -q -f ${format} ${opts} "${path}" 4M)
  # Keep in step with c-tests/formats_open.c.
  run("${QEMU_IO}" -f ${format}
      -c "write -P 0x11 0 512"
      -c "write -P 0x22 1048576 65536"
      -c "write -P 0x33 4190208 4096"
      "${path}")
endforeach()
